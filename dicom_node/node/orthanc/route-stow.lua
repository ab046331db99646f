-- Orthanc: route every stable ORIGINAL CT series to dicom-node by DICOMweb STOW-RS.
-- Needs the orthanc-dicomweb plugin and, in its "DicomWeb" section:
--   "Servers": { "dicomnode": ["http://<node host>:8080/dicomweb/"] },
-- plus "LuaScripts": ["route-stow.lua"]. DERIVED series (our own output) are never routed.
function OnStableSeries(seriesId, tags, metadata)
  local series = ParseJson(RestApiGet('/series/' .. seriesId))
  local first = series['Instances'][1]
  local itags = ParseJson(RestApiGet('/instances/' .. first .. '/simplified-tags'))
  local imageType = itags['ImageType'] or ''
  if itags['Modality'] == 'CT' and string.find(imageType, 'DERIVED') == nil then
    print('dicom-node: routing series ' .. seriesId)
    RestApiPost('/dicom-web/servers/dicomnode/stow',
                '{"Resources":["' .. seriesId .. '"],"Synchronous":false}')
  end
end
