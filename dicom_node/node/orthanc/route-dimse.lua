-- Orthanc: route every stable ORIGINAL CT series to dicom-node by C-STORE.
-- Needs, in orthanc.json:  "DicomModalities": { "dicomnode": ["DICOMNODE", "<node host>", 11112] },
-- "LuaScripts": ["route-dimse.lua"], and a StableAge that fits your scanner (default 60 s).
-- DERIVED series (dicom-node's own output among them) are never routed, so results cannot loop.
-- Orthanc 1.10's SendToModality() fails for a series; the REST call below works.
function OnStableSeries(seriesId, tags, metadata)
  local series = ParseJson(RestApiGet('/series/' .. seriesId))
  local first = series['Instances'][1]
  local itags = ParseJson(RestApiGet('/instances/' .. first .. '/simplified-tags'))
  local imageType = itags['ImageType'] or ''
  if itags['Modality'] == 'CT' and string.find(imageType, 'DERIVED') == nil then
    print('dicom-node: routing series ' .. seriesId)
    RestApiPost('/modalities/dicomnode/store',
                '{"Resources":["' .. seriesId .. '"],"Asynchronous":true}')
  end
end
